//! Folding any channel layout down to stereo.

use symphonia::core::audio::Channels;

/// Standard (ITU-R BS.775) downmix coefficients per source channel; LFE is dropped.
pub(super) fn downmix_coefficients(layout: Channels, count: usize) -> Vec<(f32, f32)> {
    const MINUS_3DB: f32 = std::f32::consts::FRAC_1_SQRT_2;
    match count {
        1 => return vec![(1.0, 1.0)],
        2 => return vec![(1.0, 0.0), (0.0, 1.0)],
        _ => {}
    }
    let positions: Vec<Channels> = layout.iter().collect();
    if positions.len() != count {
        // No usable layout: alternate left and right, scaled so the sum keeps its level.
        let scale = 2.0 / count as f32;
        return (0..count).map(|i| if i % 2 == 0 { (scale, 0.0) } else { (0.0, scale) }).collect();
    }
    let coefficients: Vec<(f32, f32)> = positions
        .iter()
        .map(|&position| match position {
            Channels::FRONT_LEFT | Channels::FRONT_LEFT_CENTRE | Channels::FRONT_LEFT_WIDE | Channels::FRONT_LEFT_HIGH => (1.0, 0.0),
            Channels::FRONT_RIGHT | Channels::FRONT_RIGHT_CENTRE | Channels::FRONT_RIGHT_WIDE | Channels::FRONT_RIGHT_HIGH => (0.0, 1.0),
            Channels::FRONT_CENTRE | Channels::TOP_FRONT_CENTRE | Channels::TOP_CENTRE => (MINUS_3DB, MINUS_3DB),
            Channels::REAR_CENTRE | Channels::TOP_REAR_CENTRE => (0.5, 0.5),
            Channels::LFE1 | Channels::LFE2 => (0.0, 0.0),
            Channels::REAR_LEFT | Channels::SIDE_LEFT | Channels::REAR_LEFT_CENTRE | Channels::TOP_FRONT_LEFT | Channels::TOP_REAR_LEFT => (MINUS_3DB, 0.0),
            _ => (0.0, MINUS_3DB),
        })
        .collect();
    // Keep a full-scale signal in every channel from clipping the fold-down.
    let left_sum: f32 = coefficients.iter().map(|c| c.0).sum();
    let right_sum: f32 = coefficients.iter().map(|c| c.1).sum();
    let norm = 1.0 / left_sum.max(right_sum).max(1.0);
    coefficients.into_iter().map(|(l, r)| (l * norm, r * norm)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_one_folds_down_with_itu_coefficients() {
        let layout = Channels::FRONT_LEFT | Channels::FRONT_RIGHT | Channels::FRONT_CENTRE | Channels::LFE1 | Channels::SIDE_LEFT | Channels::SIDE_RIGHT;
        let coefficients = downmix_coefficients(layout, 6);
        let norm = 1.0 / (2.0 * std::f32::consts::FRAC_1_SQRT_2 + 1.0);
        assert!((coefficients[0].0 - norm).abs() < 1e-6);
        assert!((coefficients[2].0 - std::f32::consts::FRAC_1_SQRT_2 * norm).abs() < 1e-6);
        assert_eq!(coefficients[3], (0.0, 0.0));
        assert_eq!(coefficients[4].1, 0.0);
        assert_eq!(downmix_coefficients(Channels::FRONT_LEFT, 1), vec![(1.0, 1.0)]);
    }
}
