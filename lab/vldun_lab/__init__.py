"""The VLDUN lab: everything that makes and measures the model, none of which the product needs.

Modules that build models import `baseline`, which registers the lab's U-Net with the product's model
builder (`VLDUNLib.network.ARCHITECTURES`); this package itself imports nothing, so a light child process
(`python -m vldun_lab.benchmark` for a peer) does not load the network.
"""
