"""Synthetic replicas: writers of procedurally generated data in real datasets' on-disk layouts.

Each module writes one dataset's layout (``idrid``, ``pascal_context``) so that the loaders in
``moekit.data`` can be tested and demonstrated without the real download; the loaders never
know whether they read a replica. ``moekit data make-*`` calls them from the command line.
"""
