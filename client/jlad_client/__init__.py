"""jlad client: talk to a jlad service, and the small numpy helpers every part shares."""
