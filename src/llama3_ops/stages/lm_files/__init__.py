"""Files that run on the course host for the chat, quantize and LLaVA stages.

They are uploaded with :func:`llama3_ops.remote.files.put_package_file` and run with the lmdeploy
environment's own interpreter, so they use only the standard library, torch and lmdeploy, and keep
to Python 3.8 syntax (the course environment is Python 3.10 with lmdeploy 0.4.1).
"""
