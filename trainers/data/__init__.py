"""Datasets in the MeCoVQA format: the sample schema and loader, the checker, statistics, and the
builder of the embedded dataset (`medplib data build`) from real images in registry packages."""
