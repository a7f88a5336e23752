"""Reports generated from the database alone."""
