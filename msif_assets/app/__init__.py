"""msif as an application: the command line, the in-process runner behind it, and its reports.

Imports point one way: app → defs → pipeline → engine/lake.
"""
