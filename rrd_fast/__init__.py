"""rrd-fast: fast, faithful knowledge distillation with Relational Representation Distillation."""

__version__ = "0.1.0"
