"""The servlet: one process per env replica, holding module instances by name."""
