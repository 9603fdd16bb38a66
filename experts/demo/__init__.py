"""experts/demo"""
