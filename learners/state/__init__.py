"""What the learner keeps of the stream: users, catalogue, item features, stream state, erasure, row agreement."""
