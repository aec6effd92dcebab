"""speechvq: discrete speech units from a VQ-VAE.

Importing speechvq sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (unless the user set it),
so torch's CPU threads stay fair when other processes use the cores: see :mod:`speechvq.runtime`.
"""

# Keep this import first, before anything that imports torch: libgomp reads the policy once.
from speechvq import runtime as runtime
