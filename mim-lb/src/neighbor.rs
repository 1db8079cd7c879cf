//! Placeholder with the agreed interface; replaced by the neighbor branch.
use std::{collections::BTreeSet, net::IpAddr};

#[derive(Debug, thiserror::Error)]
pub enum NeighborError { #[error("interface {0}: {1}")] Interface(String, std::io::Error) }
pub async fn interface_mac(interface: &str) -> Result<[u8; 6], NeighborError> {
    #[repr(C)] struct Ifreq { name: [u8; 16], family: u16, data: [u8; 14], _pad: [u8; 8] }
    let mut req = Ifreq { name: [0; 16], family: 0, data: [0; 14], _pad: [0; 8] };
    req.name[..interface.len().min(15)].copy_from_slice(&interface.as_bytes()[..interface.len().min(15)]);
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc != 0 { return Err(NeighborError::Interface(interface.into(), err)); }
    let mut mac = [0; 6]; mac.copy_from_slice(&req.data[..6]); Ok(mac)
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeighborEvent { Resolved { address: IpAddr, mac: [u8; 6] }, Unresolved { address: IpAddr, reason: String } }
pub struct NeighborResolver;
impl NeighborResolver {
    pub async fn start(_interface: &str, _events: tokio::sync::mpsc::Sender<NeighborEvent>) -> Result<Self, NeighborError> { Ok(NeighborResolver) }
    pub fn set_wanted(&self, _addresses: BTreeSet<IpAddr>) {}
    pub async fn shutdown(self) {}
}
