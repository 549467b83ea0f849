"""shuttle"""
