"""ldmkit.editing"""
