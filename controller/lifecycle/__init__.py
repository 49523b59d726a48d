"""Model lifecycle: states, the pure eviction policy, one owner task per model, the supervisor."""
