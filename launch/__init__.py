"""Login-node side of mrlora: plan the job graph, submit it, resume, status, cancel.

Nothing here imports torch, diffusers or transformers (login nodes are slow and shared); jobs reach the heavy
code through entry points imported inside the job (``launch.jobs``).
"""
