"""What the app user may choose for themselves, within what root allows."""
