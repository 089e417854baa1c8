"""Triton kernels, each in kernels/<op>/ beside a plain-torch reference.py (DESIGN section 5).

Imports torch and triton only. The MoE and GDN cores arrive with their issues; nothing is bound yet.
"""
