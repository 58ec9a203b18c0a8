"""firstkit"""
