"""Triton kernels of landmark-llama. Each kernel file is self-contained (torch and triton only), because
`save_pretrained` copies it flat beside the modeling file of a saved model folder."""
