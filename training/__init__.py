"""Offline De-Pois training: data, the authenticated cGAN, the mimic model, calibration, export.

Needs the ``train`` extra (torch). The runtime package ``depois_stream`` never imports this.
Importing ``training`` itself is cheap; torch loads with the modules that need it.
"""
