"""Shell actions: token substitution, the batch runner (C), orphans of actions."""
