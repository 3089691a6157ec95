# PTSAM bundle code. MONAI puts the bundle root on sys.path and imports this as `scripts`.
