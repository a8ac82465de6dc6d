"""ParaspinalSeg library: everything the Slicer module, the command line and the trainer share.

Importing this package (or ``anatomy``, ``preprocessing``, ``measurements``) never imports torch,
so the Slicer module can load in a Python without torch; the network modules import it lazily.
"""

__version__ = "0.1.0"
