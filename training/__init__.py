"""ParaspinalSeg trainer: data, losses, augmentation, the asynchronous schedule, cross-validation, export.

Imports the one network definition from ``ParaspinalSegLib.network``; see ``training/README.md``.
"""
