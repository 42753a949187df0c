"""Throughput benchmark of the Llama 3 course (lmdeploy ``profile_throughput`` rules), on any host.

``python -m llama3_ops.bench online|offline|check|crosscheck --help``
"""
