"""Parallel layout: degrees, mesh, launch, gradient reduction."""
