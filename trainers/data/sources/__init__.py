"""The real images and masks the embedded dataset is built from, one module per source."""
