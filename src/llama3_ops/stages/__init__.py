"""Course stages other than serving, each run on the host by a thin Fabric task.

Host-side files (apps, scripts, config templates) live next to the module that uses them, are
shipped with the package, and are uploaded with :func:`llama3_ops.remote.files.put_text`.
"""
