"""Tests of the example model images."""
