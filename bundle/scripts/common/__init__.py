"""What every layer shares: on/off knobs as MONAI's command line spells them, and atomic file writes."""
