//! The addresses a webhook must not reach: every block of IANA's IPv4 and IPv6 Special-Purpose
//! Address Registries (RFC 6890 and the RFCs they list) that is not globally reachable, plus the
//! blocks that embed an IPv4 address or lead elsewhere (6to4, Teredo, NAT64, IPv4-mapped and
//! -compatible), multicast, and the reserved and broadcast blocks. One table, read for the address
//! actually connected to. No maintained crate carries the registries (the standard library's
//! `is_global` is still unstable), so they are written out here, each with its source, and tested
//! one address per block.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// (first address, prefix length, what it is).
const V4: [(Ipv4Addr, u8, &str); 19] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8, "this network (RFC 791)"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private use (RFC 1918)"),
    (Ipv4Addr::new(100, 64, 0, 0), 10, "shared address space, CGNAT (RFC 6598)"),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback (RFC 1122)"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "link local (RFC 3927)"),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private use (RFC 1918)"),
    (Ipv4Addr::new(192, 0, 0, 0), 24, "IETF protocol assignments (RFC 6890)"),
    (Ipv4Addr::new(192, 0, 2, 0), 24, "documentation, TEST-NET-1 (RFC 5737)"),
    (Ipv4Addr::new(192, 88, 99, 0), 24, "6to4 relay anycast (RFC 7526, deprecated)"),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private use (RFC 1918)"),
    (Ipv4Addr::new(198, 18, 0, 0), 15, "benchmarking (RFC 2544)"),
    (Ipv4Addr::new(198, 51, 100, 0), 24, "documentation, TEST-NET-2 (RFC 5737)"),
    (Ipv4Addr::new(203, 0, 113, 0), 24, "documentation, TEST-NET-3 (RFC 5737)"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast (RFC 5771)"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved (RFC 1112)"),
    (Ipv4Addr::new(255, 255, 255, 255), 32, "limited broadcast (RFC 919)"),
    // Anycast and relay blocks that are globally reachable are not listed; these are not.
    (Ipv4Addr::new(192, 0, 0, 170), 31, "NAT64/DNS64 discovery (RFC 7050)"),
    (Ipv4Addr::new(192, 0, 0, 8), 32, "IPv4 dummy address (RFC 7600)"),
    (Ipv4Addr::new(192, 0, 0, 0), 29, "IPv4 service continuity prefix (RFC 7335)"),
];

const V6: [(Ipv6Addr, u8, &str); 18] = [
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1), 128, "loopback (RFC 4291)"),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 128, "unspecified (RFC 4291)"),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96, "IPv4-mapped (RFC 4291)"),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 96, "IPv4-compatible (RFC 4291, deprecated)"),
    (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96, "IPv4/IPv6 translation, NAT64 (RFC 6052): leads to an IPv4 address"),
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48, "local-use IPv4/IPv6 translation (RFC 8215)"),
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, "discard-only (RFC 6666)"),
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23, "IETF protocol assignments (RFC 2928)"),
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32, "Teredo (RFC 4380): embeds an IPv4 address"),
    (Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0), 48, "benchmarking (RFC 5180)"),
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32, "documentation (RFC 3849)"),
    (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16, "6to4 (RFC 3056): embeds an IPv4 address"),
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20, "documentation (RFC 9637)"),
    (Ipv6Addr::new(0x5f00, 0, 0, 0, 0, 0, 0, 0), 16, "segment routing SIDs (RFC 9602)"),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7, "unique local (RFC 4193)"),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link-local unicast (RFC 4291)"),
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10, "site-local (RFC 3879, deprecated)"),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, "multicast (RFC 4291)"),
];

fn v4_contains((first, prefix, _): &(Ipv4Addr, u8, &str), ip: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(*first) & mask
}

fn v6_contains((first, prefix, _): &(Ipv6Addr, u8, &str), ip: Ipv6Addr) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(*prefix)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(*first) & mask
}

/// The special-purpose block `ip` lies in, if any.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => V4.iter().find(|block| v4_contains(block, v4)).map(|block| block.2),
        IpAddr::V6(v6) => V6.iter().find(|block| v6_contains(block, v6)).map(|block| block.2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One address in each block, and its neighbours just outside where they are public.
    #[test]
    fn every_block_of_the_registries_is_refused_and_its_neighbours_are_not() {
        let refused = [
            "0.1.2.3",
            "10.255.0.1",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "169.254.169.254",
            "172.31.0.1",
            "192.0.0.1",
            "192.0.2.10",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.251",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.0.170",
            "192.0.0.8",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            "100::1",
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:10::1",
            "2001:db8::1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "3fff::1",
            "5f00::1",
            "fd00::1",
            "fc00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
        ];
        for ip in refused {
            assert!(special_purpose(ip.parse().unwrap()).is_some(), "{ip} is special-purpose");
        }
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:200::1",
            "2003::1",
            "3ffe::1",
            "4000::1",
        ];
        for ip in public {
            assert_eq!(special_purpose(ip.parse().unwrap()), None, "{ip} is public");
        }
    }
}
