"""The domain: the order and its rules (validation, masking); no I/O, no imports of other layers."""
