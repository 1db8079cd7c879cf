//! Backend MAC resolution over netlink (to be written).
