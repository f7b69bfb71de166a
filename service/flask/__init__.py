"""flask"""
