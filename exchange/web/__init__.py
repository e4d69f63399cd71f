"""HTTP plumbing shared by the hub and the node: errors, limits, health, request log.

It sits below ``hub`` and ``node`` and knows nothing of either.
"""
