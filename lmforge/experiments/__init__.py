"""Experiments: sweeps of many training runs (`lmforge sweep`) and scaling-law fits over them (`lmforge scaling fit`)."""
