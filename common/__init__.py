"""What runner and sync share without depending on each other: the settings mechanism and safe file writes.

Neither TensorFlow nor anything of runner/ or sync/ is imported here.
"""
