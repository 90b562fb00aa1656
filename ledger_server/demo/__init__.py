"""Example data: a rate card and catalogue from the seed documents, loaded through
AdminService so a newcomer can make realistic calls right after `make run`."""
