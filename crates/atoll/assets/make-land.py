#!/usr/bin/env python3
"""Makes land-110m.path, the coastline the status page draws: Natural Earth's 1:110m land
(public domain), as redistributed in TopoJSON by the npm package world-atlas 2 (land-110m.json),
projected equirectangular onto the page's 720 x 360 map (x = (lon + 180) * 2, y = (90 - lat) * 2),
rounded to whole units, with rings smaller than a few units left out.

    npm pack world-atlas@2 && tar xzf world-atlas-2.*.tgz
    python3 crates/atoll/assets/make-land.py package/land-110m.json > crates/atoll/assets/land-110m.path
"""
import json
import sys

topo = json.load(open(sys.argv[1]))
(sx, sy), (tx, ty) = topo["transform"]["scale"], topo["transform"]["translate"]
arcs = []
for arc in topo["arcs"]:
    x = y = 0
    points = []
    for dx, dy in arc:
        x += dx
        y += dy
        points.append((x * sx + tx, y * sy + ty))
    arcs.append(points)


def ring(indices):
    points = []
    for i in indices:
        arc = arcs[i] if i >= 0 else arcs[~i][::-1]
        points.extend(arc if not points else arc[1:])
    return points


def polygons(geometry):
    if geometry["type"] == "Polygon":
        yield geometry["arcs"]
    elif geometry["type"] == "MultiPolygon":
        yield from geometry["arcs"]
    elif geometry["type"] == "GeometryCollection":
        for g in geometry["geometries"]:
            yield from polygons(g)


out = []
for polygon in polygons(topo["objects"]["land"]):
    for indices in polygon:
        pts = [(round((lon + 180) * 2), round((90 - lat) * 2)) for lon, lat in ring(indices)]
        dedup = [p for i, p in enumerate(pts) if i == 0 or p != pts[i - 1]]
        xs, ys = [p[0] for p in dedup], [p[1] for p in dedup]
        if len(dedup) < 4 or (max(xs) - min(xs)) + (max(ys) - min(ys)) < 6:
            continue
        out.append("M" + "L".join(f"{x} {y}" for x, y in dedup) + "Z")
print("".join(out))
