"""Layer 7, observability: telemetry, the gradient-distribution monitor and study, and the
pre-flight. Imports: the layers below.
"""
