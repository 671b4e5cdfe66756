"""Placeholder: the extension build is added by the csrc/ work."""
from setuptools import setup

setup()
