"""Files copied into a Hugging Face export of a routed MoM (loaded with ``trust_remote_code``).

They import ``mom_dist`` at load time: install mom_dist in the evaluation environment.
"""
