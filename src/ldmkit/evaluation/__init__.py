"""ldmkit.evaluation"""
