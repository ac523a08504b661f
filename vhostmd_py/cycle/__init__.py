"""The cycle: collect the metrics, render the document, the snapshot types."""
