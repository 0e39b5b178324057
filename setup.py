from setuptools import setup

setup()  # metadata lives in pyproject.toml
