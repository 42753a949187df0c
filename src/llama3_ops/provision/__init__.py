"""Provisioning helpers on the controller: running the playbook, hash locks, wheelhouses."""
