//! Regions and how far apart they are.
//!
//! A region is a name (`us-east`, `eu-west`, …) with coordinates. Distance is the great-circle
//! distance between two regions' coordinates, unless an explicit latency table says otherwise.
//! Cloud providers' zone-style names resolve to their region: `us-east-1`, `us-east-1a` and
//! `US-East` are all `us-east`.

use std::collections::BTreeMap;

/// A point on the globe, in degrees.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Coord {
    pub lat: f64,
    pub lon: f64,
}

/// The regions Atoll knows without configuration: the common cloud region names, at the city
/// their providers' data centres are in.
pub const BUILTIN: &[(&str, f64, f64)] = &[
    ("us-east", 38.9, -77.4),         // N. Virginia
    ("us-east-2", 40.0, -83.0),       // Ohio
    ("us-central", 41.3, -95.9),      // Iowa
    ("us-west", 45.6, -121.2),        // Oregon
    ("us-west-1", 37.4, -122.0),      // N. California
    ("ca-central", 45.5, -73.6),      // Montréal
    ("sa-east", -23.5, -46.6),        // São Paulo
    ("eu-west", 53.3, -6.3),          // Ireland
    ("eu-west-2", 51.5, -0.1),        // London
    ("eu-west-3", 48.9, 2.4),         // Paris
    ("eu-central", 50.1, 8.7),        // Frankfurt
    ("eu-north", 59.3, 18.1),         // Stockholm
    ("eu-south", 45.5, 9.2),          // Milan
    ("me-central", 25.2, 55.3),       // UAE
    ("af-south", -33.9, 18.4),        // Cape Town
    ("ap-south", 19.1, 72.9),         // Mumbai
    ("ap-east", 22.3, 114.2),         // Hong Kong
    ("ap-southeast", 1.3, 103.8),     // Singapore
    ("ap-southeast-2", -33.9, 151.2), // Sydney
    ("ap-northeast", 35.7, 139.7),    // Tokyo
    ("ap-northeast-2", 37.6, 127.0),  // Seoul
    ("ap-northeast-3", 34.7, 135.5),  // Osaka
];

const EARTH_RADIUS_KM: f64 = 6371.0;

/// The great-circle distance between two points (haversine), in kilometres.
pub fn great_circle_km(a: Coord, b: Coord) -> f64 {
    let (lat1, lat2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// Known regions (built-in plus configured) and an optional latency table.
#[derive(Debug, Clone)]
pub struct Regions {
    coords: BTreeMap<String, Coord>,
    /// `(from, to)` → milliseconds; consulted before coordinates, either direction.
    latency: BTreeMap<(String, String), f64>,
}

impl Default for Regions {
    fn default() -> Regions {
        Regions::builtin()
    }
}

impl Regions {
    /// The built-in table.
    pub fn builtin() -> Regions {
        let coords = BUILTIN.iter().map(|&(name, lat, lon)| (name.to_owned(), Coord { lat, lon })).collect();
        Regions { coords, latency: BTreeMap::new() }
    }

    /// Adds or replaces a region.
    pub fn set(&mut self, name: &str, coord: Coord) {
        self.coords.insert(name.to_ascii_lowercase(), coord);
    }

    /// Sets the latency between two regions (both directions unless the other is set too).
    pub fn set_latency(&mut self, from: &str, to: &str, ms: f64) {
        self.latency.insert((from.to_ascii_lowercase(), to.to_ascii_lowercase()), ms);
    }

    /// The known region a name means: itself, or with a zone suffix (`-1`, `-1a`, `a`) removed.
    /// `None` for a name no configured or built-in region matches.
    pub fn resolve(&self, name: &str) -> Option<String> {
        let name = name.trim().to_ascii_lowercase();
        let mut candidate = name.as_str();
        loop {
            if self.coords.contains_key(candidate) || self.in_latency_table(candidate) {
                return Some(candidate.to_owned());
            }
            // Drop one trailing zone letter or one trailing `-digits` group.
            let trimmed = if let Some(rest) = candidate.strip_suffix(|c: char| c.is_ascii_lowercase())
                && rest.ends_with(|c: char| c.is_ascii_digit())
            {
                rest
            } else if let Some((head, tail)) = candidate.rsplit_once('-')
                && !tail.is_empty()
                && tail.bytes().all(|b| b.is_ascii_digit())
            {
                head
            } else {
                return None;
            };
            candidate = trimmed;
        }
    }

    fn in_latency_table(&self, name: &str) -> bool {
        self.latency.keys().any(|(a, b)| a == name || b == name)
    }

    /// How far a client in `from` is from a site in `to` (both resolved names): the latency
    /// table's milliseconds when it has the pair, else great-circle kilometres; `None` when
    /// neither knows. A region is at distance 0 from itself.
    pub fn distance(&self, from: &str, to: &str) -> Option<f64> {
        if from == to {
            return Some(0.0);
        }
        if !self.latency.is_empty() {
            let (f, t) = (from.to_owned(), to.to_owned());
            if let Some(ms) = self.latency.get(&(f.clone(), t.clone())).or_else(|| self.latency.get(&(t, f)))
            {
                return Some(*ms);
            }
            if self.in_latency_table(from) && self.in_latency_table(to) {
                // Both are in an explicit table that does not list the pair: as far as it gets.
                return Some(f64::MAX);
            }
        }
        Some(great_circle_km(*self.coords.get(from)?, *self.coords.get(to)?))
    }

    /// A region's coordinates, for a name [`Regions::resolve`] accepts.
    pub fn coord(&self, name: &str) -> Option<Coord> {
        self.coords.get(&self.resolve(name)?).copied()
    }

    /// Every known region name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.coords.keys().cloned().collect();
        for (a, b) in self.latency.keys() {
            names.push(a.clone());
            names.push(b.clone());
        }
        names.sort();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_style_names_resolve_to_their_region() {
        let r = Regions::builtin();
        assert_eq!(r.resolve("us-east").as_deref(), Some("us-east"));
        assert_eq!(r.resolve("US-East-1").as_deref(), Some("us-east"));
        assert_eq!(r.resolve("us-east-1a").as_deref(), Some("us-east"));
        assert_eq!(r.resolve("us-east-2").as_deref(), Some("us-east-2"));
        assert_eq!(r.resolve("eu-west-1").as_deref(), Some("eu-west"));
        assert_eq!(r.resolve("ap-south-1").as_deref(), Some("ap-south"));
        assert_eq!(r.resolve("mars-north"), None);
        assert_eq!(r.resolve(""), None);
        assert_eq!(r.resolve("-1"), None);
    }

    #[test]
    fn great_circle_distances_are_plausible() {
        let r = Regions::builtin();
        let d = |a, b| r.distance(a, b).expect("known");
        // Virginia–Ireland ≈ 5,500 km; Virginia–Mumbai ≈ 13,000 km.
        assert!((5_000.0..6_000.0).contains(&d("us-east", "eu-west")), "{}", d("us-east", "eu-west"));
        assert!((12_000.0..14_000.0).contains(&d("us-east", "ap-south")));
        assert_eq!(d("eu-west", "us-east"), d("us-east", "eu-west"));
        assert_eq!(d("eu-west", "eu-west"), 0.0);
        // Frankfurt is nearer to Ireland than to Mumbai; Singapore nearer to Mumbai than to Ireland.
        assert!(d("eu-central", "eu-west") < d("eu-central", "ap-south"));
        assert!(d("ap-southeast", "ap-south") < d("ap-southeast", "eu-west"));
    }

    #[test]
    fn latency_table_wins_over_coordinates() {
        let mut r = Regions::builtin();
        r.set_latency("eu-central", "ap-south", 10.0);
        r.set_latency("eu-central", "eu-west", 30.0);
        assert_eq!(r.distance("eu-central", "ap-south"), Some(10.0));
        assert_eq!(r.distance("ap-south", "eu-central"), Some(10.0));
        // Pairs the table does not list, between regions it lists, are as far as it gets.
        assert_eq!(r.distance("ap-south", "eu-west"), Some(f64::MAX));
    }

    #[test]
    fn configured_regions_extend_the_table() {
        let mut r = Regions::builtin();
        assert_eq!(r.resolve("home-lab"), None);
        r.set("home-lab", Coord { lat: 52.5, lon: 13.4 });
        assert_eq!(r.resolve("home-lab-1").as_deref(), Some("home-lab"));
        assert!(r.distance("home-lab", "eu-central").expect("known") < 1_000.0);
    }
}
