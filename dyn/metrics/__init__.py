"""Prometheus helpers shared by the daemon and the workers: one registry per process
(never the global one), collectors that read a process's own figures at scrape
time, and a small aiohttp endpoint bound to the node's bind address.
"""
