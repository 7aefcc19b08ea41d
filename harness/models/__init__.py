"""Models: the zoo of tiny families pretrained here and their size presets."""
