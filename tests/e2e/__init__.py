"""The e2e tier (a package so that its conftest is e2e.conftest, not a second `conftest`)."""
