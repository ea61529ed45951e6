"""Where images come from (folders, archives and URLs, the Drive mount) and the scan that turns them into a
stable, split image list."""
