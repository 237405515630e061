"""Reading labelled image folders. Importing this package never imports torch;
the torch-side pieces (augmentation, tensors) live in ``pipeline.data.augment``."""
