import { describe, expect, it } from 'vitest';
import { formatBytes, formatEta, formatRate, formatTick, formatValue } from '../../src/ui/format';

describe('numbers on the page', () => {
  it('bytes, rates and time left', () => {
    expect([formatBytes(512), formatBytes(1536), formatBytes(32.3 * 2 ** 20), formatBytes(6.4e9)]).toEqual(['512 B', '1.50 KiB', '32.3 MiB', '5.96 GiB']);
    expect([formatRate(0), formatRate(2 ** 21)]).toEqual(['-', '2.00 MiB/s']);
    expect([formatEta(null), formatEta(0.2), formatEta(42), formatEta(125), formatEta(7260)]).toEqual(['estimating', 'under a second', '42 s', '2 min 5 s', '2 h 1 min']);
  });
  it('metric values and chart ticks stay short at every scale', () => {
    expect([formatValue(undefined), formatValue(0), formatValue(7.42e-6), formatValue(0.123456), formatValue(-1), formatValue(12345)]).toEqual(['-', '0', '7.42e-6', '0.1235', '-1', '1.23e+4']);
    expect([formatTick(0), formatTick(1e-5), formatTick(2.5e-6), formatTick(0.25), formatTick(39.5), formatTick(15000)]).toEqual(['0', '1e-5', '2.5e-6', '0.25', '39.5', '15k']);
  });
});
